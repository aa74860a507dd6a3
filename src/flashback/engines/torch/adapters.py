"""Which LoRA adapter serves which mode and endpoint, and attaching them (PEFT) to a base model.

An adapter serves only the layout it was trained for (its card's `mode`), so an append adapter never
alters prepend or none; a chat adapter (its card's `endpoint`) serves the chats of its mode, a text adapter the
completions. Each is loaded under its slot's name (cards.pick_slot) and switched per forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from flashback.cards import adapter_slot, read_card, slot_mode
from flashback.errors import FlashbackError, first_line
from flashback.registry import shipped_adapters
from flashback.text.tokenize import tokenizer_fingerprint


def plan_adapters(model: str | None, adapters: Sequence[str] = (), no_default: bool = False) -> dict[str, str]:
    """Slot (a mode, or MODE-chat) -> adapter folder: the one place that decides it (CLI, Python API, server).

    Modes without an adapter given take the adapters shipped for that mode of a named model (completions' and
    chats'), unless `no_default`; an adapter given for a mode replaces them all, and serves both endpoints unless
    another is given for the other. `none` never has one.
    """
    plan: dict[str, str] = {}
    for path in adapters:
        slot = adapter_slot(path)
        if slot in plan:
            kind = "chat adapters" if slot != slot_mode(slot) else "adapters"
            raise FlashbackError(f"two {kind} for {slot_mode(slot)} mode: {plan[slot]} and {path}")
        plan[slot] = str(path)
    if not no_default:
        given = {slot_mode(slot) for slot in plan}
        plan.update({s: p for s, p in shipped_adapters(model).items() if slot_mode(s) not in given})
    return plan


def attach_adapters(model, tokenizer, plan: dict[str, str], base_name: str):
    """Wrap `model` in the PEFT adapters of `plan` (slot -> folder), each named after its slot.

    The tokenizer must already hold the markers. Each adapter's card must match the tokenizer.
    """
    from peft import PeftModel

    for slot, path in plan.items():
        card = read_card(path)
        want = card.get("tokenizer_fingerprint")
        if want and want != tokenizer_fingerprint(tokenizer):
            raise FlashbackError(
                f"adapter {path} was trained for another tokenizer/base model ({card.get('base_model')}), "
                f"not {base_name}"
            )
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=slot)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=slot)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FlashbackError(f"cannot load adapter {path} onto {base_name}: {first_line(exc)}") from None
    return model


def lora_targets(model, requested: Sequence[str]) -> list[str]:
    """Linear layer names to adapt, in the model's order; "all-linear" is every linear layer but the output head,
    resolved to names so that the card says what was trained."""
    linear = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if list(requested) == ["all-linear"]:
        head = model.get_output_embeddings()
        return [name for name, m in linear.items() if m is not head]
    missing = [t for t in requested if t not in linear]
    if missing:
        raise FlashbackError(f"target modules {missing} not found; this model's linear layers: {sorted(linear)}")
    return list(requested)


class TokenRows:
    """The embedding rows each adapter trained (PEFT "trainable tokens": the markers), kept beside the model.

    PEFT applies trained rows by copying the whole embedding matrix, and the tied output matrix, at every forward:
    for SmolLM2 that is two 113 MB copies per decoded token, half the time of a decode step. `fold` removes PEFT's
    wrappers instead, and `write` puts an adapter's rows (or the base model's) into the shared matrices when the
    engine switches adapters: two rows per switch.
    """

    def __init__(self) -> None:
        self.rows: dict[str | None, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {None: {}}

    @classmethod
    def fold(cls, model) -> TokenRows:
        """Unwrap every trainable-tokens layer of the PEFT `model` in place, keeping its rows."""
        from peft.utils.other import TrainableTokensWrapper

        rows = cls()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, TrainableTokensWrapper):
                    continue
                layer = child.token_adapter
                role = "input" if isinstance(layer.base_layer, torch.nn.Embedding) else "output"
                weight = layer.base_layer.weight
                touched = []
                for adapter, ids in layer.token_indices.items():
                    index = torch.tensor(ids, device=weight.device)
                    values = layer.trainable_tokens_delta[adapter].detach().to(weight).clone()
                    rows.rows.setdefault(adapter, {})[role] = (index, values)
                    touched += ids
                index = torch.tensor(sorted(set(touched)), device=weight.device)
                rows.rows[None][role] = (index, weight.detach()[index].clone())
                setattr(parent, name, layer.base_layer)
        return rows

    def __bool__(self) -> bool:
        return len(self.rows) > 1

    def write(self, model, adapter: str | None) -> None:
        """Give `model` the rows of `adapter` (None: the base model's rows, wherever any adapter trained one)."""
        weights = {"input": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}
        with torch.no_grad():
            for rows in (self.rows[None], self.rows.get(adapter, {})):
                for role, (index, values) in rows.items():
                    weight = weights[role]  # the model may have moved since (load_model folds, then moves)
                    weight.index_copy_(0, index.to(weight.device), values.to(weight))


@contextmanager
def fresh_lora(engine, targets: Sequence[str], r: int, alpha: int) -> Iterator[tuple]:
    """(engine, PEFT model, layer names): a PyTorch engine's model under a new, untrained LoRA adapter (r, alpha on
    `targets`, named as `train --target-modules`), and the PEFT model to merge and unmerge it, for timing what an
    unmerged adapter costs (bench). The plain model comes back afterwards."""
    from peft import LoraConfig, get_peft_model

    base = engine.model
    names = lora_targets(base, targets)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=names))
    peft_model.eval()
    try:
        adapted = type(engine)(peft_model, engine.tokenizer, engine.name, engine.device, engine.marker_ids)
        yield adapted, peft_model, names
    finally:
        engine.model = peft_model.unload()
